"""Worklist integration: findings and AI flags out to RIS and worklist systems.

One notification is one message about one job to one configured notifier (HL7 v2.5.1
ORU^R01 over MLLP, a FHIR R4 transaction Bundle, or a signed JSON webhook). Its row in
``notifications`` is the outbox (DESIGN invariant 2): ``outbox`` creates the rows when a job
succeeds or fails for good, the scheduler's sweep hands what is due to the io queue, and a
receiver that is down is tried again with backoff; a receiver that refuses the message ends
the row ``failed`` with its answer, and ``pacs-agent notify retry`` sends it again.

Payloads carry patient identifiers (HL7 PID, FHIR subject): they are never logged.
"""
