"""HL7 v2.5.1 ORU^R01 over MLLP: the AI findings of one job as an observation result.

Message (built and validated with hl7apy, strict, v2.5.1):

- MSH: sending/receiving application and facility from the settings, control id ``N<id>``
  (the notification's id, so a re-send carries the same id), processing id P.
- PID: PID-3 Patient ID (with its issuer), PID-5 name, PID-7 birth date, PID-8 sex, from
  the images' patient module.
- OBR: OBR-3 filler order number ``<job id>^PACS-AGENT``, OBR-4 the model
  (``<name>^<name> <version>^99PACSAGENT``), OBR-18 Accession Number, OBR-22 when the job
  finished, OBR-25 result status F (findings) or X (the AI could not process the series).
- OBX, one per finding: NM, coded as in the model card (``value^meaning^scheme``), sub-id the
  segment or output number; a segment's volume in ``mm3`` (UCUM), a classification's
  probability in ``1`` (UCUM); OBX-8 ``A`` when the model flagged it, else ``N``.
- OBX ``110180^Study Instance UID^DCM`` and ``112002^Series Instance UID^DCM`` (ST); the
  AI flag as a CE (``AI-FLAG^AI study flag^99PACSAGENT``: none / positive / critical) and the
  suggested priority as a CE from HL7 table 0027 (S, A, R); for a job that failed, one TX
  saying why the AI could not process the series.

MLLP: one connection per message, ``<VT>message<FS><CR>``, then the ACK is read. AA/CA is
sent; AE/AR/CE/CR is refused (the error text of MSA-3 / ERR kept); no ACK, a dropped
connection or an ACK for another message is tried again.
"""

from __future__ import annotations

import re
import socket
from dataclasses import dataclass
from datetime import UTC, datetime

from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.core import Message
from hl7apy.exceptions import HL7apyException
from hl7apy.parser import parse_message

from pacs_agent.config import Hl7Notifier
from pacs_agent.domain.flags import HL7_PRIORITY
from pacs_agent.notify.errors import Refused, Unreachable
from pacs_agent.notify.facts import NotificationFacts

VERSION = "2.5.1"
START_BLOCK = b"\x0b"
END_BLOCK = b"\x1c\x0d"
LOCAL_SCHEME = "99PACSAGENT"
_PRIORITY_TEXT = {"S": "STAT", "A": "ASAP", "R": "Routine"}
_MAX_ACK_BYTES = 1 << 20


def escape(value: str) -> str:
    """ER7 escaping of a text value (``\\E\\ \\F\\ \\S\\ \\T\\ \\R\\``); CR/LF become spaces."""
    out = value.replace("\\", "\\E\\")
    for char, seq in (("|", "\\F\\"), ("^", "\\S\\"), ("&", "\\T\\"), ("~", "\\R\\")):
        out = out.replace(char, seq)
    return out.replace("\r", " ").replace("\n", " ")


_UNESCAPE = {"F": "|", "S": "^", "T": "&", "R": "~", "E": "\\"}
_ESCAPE_SEQUENCE = re.compile(r"\\([FSTRE])\\")


def unescape(value: str) -> str:
    """The reverse of :func:`escape` (for reading a message back)."""
    return _ESCAPE_SEQUENCE.sub(lambda m: _UNESCAPE[m.group(1)], value)


def _ts(value: datetime) -> str:
    return value.astimezone(UTC).strftime("%Y%m%d%H%M%S+0000")


def _coded(value: str, meaning: str, scheme: str) -> str:
    return "^".join(escape(v) for v in (value, meaning, scheme))


def _number(value: float) -> str:
    return f"{value:.6g}"


def control_id(facts: NotificationFacts) -> str:
    """MSH-10: the same for every send of one notification (the receiver may deduplicate)."""
    return f"N{facts.notification_id}"


def _person_name(dicom_name: str) -> str:
    """DICOM PN (``Family^Given^Middle^Prefix^Suffix``) as an HL7 XPN; ``^`` when unknown."""
    parts = dicom_name.split("=")[0].split("^") if dicom_name else []
    return "^".join(escape(p) for p in parts[:5]) or "^"


def build_oru(facts: NotificationFacts, notifier: Hl7Notifier, now: datetime) -> str:
    """The ORU^R01 message (ER7, segments separated by CR) of ``facts``, validated strictly
    against the v2.5.1 message structure. Raises hl7apy's ValidationError when it is not."""
    m = Message("ORU_R01", version=VERSION, validation_level=VALIDATION_LEVEL.STRICT)
    m.msh.msh_3 = escape(notifier.sending_application)
    if notifier.sending_facility:
        m.msh.msh_4 = escape(notifier.sending_facility)
    if notifier.receiving_application:
        m.msh.msh_5 = escape(notifier.receiving_application)
    if notifier.receiving_facility:
        m.msh.msh_6 = escape(notifier.receiving_facility)
    m.msh.msh_7 = _ts(now)
    m.msh.msh_9 = "ORU^R01^ORU_R01"
    m.msh.msh_10 = control_id(facts)
    m.msh.msh_11 = "P"
    m.msh.msh_15 = "AL"  # accept acknowledgment: always
    m.msh.msh_16 = "NE"  # application acknowledgment: never (the ACK is the answer)

    result = m.add_group("ORU_R01_PATIENT_RESULT")
    pid = result.add_group("ORU_R01_PATIENT").add_segment("PID")
    pid.pid_1 = "1"
    patient_id = escape(facts.patient_id or "")
    issuer = escape(facts.patient.issuer_of_patient_id)
    pid.pid_3 = f"{patient_id}^^^{issuer}" if issuer else patient_id
    pid.pid_5 = _person_name(facts.patient.name)
    if facts.patient.birth_date:
        pid.pid_7 = escape(facts.patient.birth_date)
    if facts.patient.sex in ("M", "F", "O"):
        pid.pid_8 = facts.patient.sex

    order = result.add_group("ORU_R01_ORDER_OBSERVATION")
    obr = order.add_segment("OBR")
    obr.obr_1 = "1"
    obr.obr_3 = f"{facts.job_id}^PACS-AGENT"
    version = facts.model_version or "?"
    obr.obr_4 = _coded(facts.model_name, f"{facts.model_name} {version}", LOCAL_SCHEME)
    obr.obr_7 = _ts(facts.finished_at or now)
    if facts.accession_number:
        obr.obr_18 = escape(facts.accession_number)
    obr.obr_22 = _ts(facts.finished_at or now)
    obr.obr_24 = "OTH"
    obr.obr_25 = "F" if facts.event == "findings" else "X"

    observations: list[tuple[str, str, str, str, str, str]] = [
        # (value type, identifier, sub-id, value, units, abnormal flag)
        ("ST", _coded("110180", "Study Instance UID", "DCM"), "", facts.study_instance_uid, "", ""),
        (
            "ST",
            _coded("112002", "Series Instance UID", "DCM"),
            "",
            facts.series_instance_uid,
            "",
            "",
        ),
    ]
    if facts.event == "findings":
        for f in facts.findings:
            code = _coded(f.code_value, f.code_meaning, f.code_scheme)
            flag = "A" if f.flag else "N"
            if f.kind == "classification" and f.probability is not None:
                observations.append(
                    ("NM", code, str(f.number), _number(f.probability), "1^^UCUM", flag)
                )
            else:
                volume = _number(f.volume_mm3 or 0.0)
                observations.append(
                    ("NM", code, str(f.number), volume, "mm3^cubic millimeter^UCUM", flag)
                )
        flag_text = facts.study_ai_flag
        observations.append(
            (
                "CE",
                _coded("AI-FLAG", "AI study flag", LOCAL_SCHEME),
                "",
                _coded(flag_text, flag_text.capitalize(), LOCAL_SCHEME),
                "",
                "A" if flag_text != "none" else "N",
            )
        )
        priority = HL7_PRIORITY[facts.suggested_priority]
        observations.append(
            (
                "CE",
                _coded("AI-PRIORITY", "AI suggested reading priority", LOCAL_SCHEME),
                "",
                _coded(priority, _PRIORITY_TEXT[priority], "HL70027"),
                "",
                "",
            )
        )
    else:
        reason = facts.job_reason or "the AI could not process this series"
        observations.append(
            (
                "TX",
                _coded("AI-STATUS", "AI processing status", LOCAL_SCHEME),
                "",
                escape(f"not processed: {reason}"[:2000]),
                "",
                "",
            )
        )
    for number, (value_type, code, sub_id, value, units, abnormal) in enumerate(
        observations, start=1
    ):
        obx = order.add_group("ORU_R01_OBSERVATION").add_segment("OBX")
        obx.obx_1 = str(number)
        obx.obx_2 = value_type
        obx.obx_3 = code
        if sub_id:
            obx.obx_4 = sub_id
        obx.obx_5 = value if value_type in ("CE", "TX") else escape(value)
        if units:
            obx.obx_6 = units
        if abnormal:
            obx.obx_8 = abnormal
        obx.obx_11 = "F" if facts.event == "findings" else "X"
    m.validate()
    text: str = m.to_er7()
    return text


@dataclass(frozen=True)
class Ack:
    code: str  # MSA-1: AA, AE, AR (or CA, CE, CR)
    control_id: str  # MSA-2
    text: str  # MSA-3 and any ERR segments' diagnostics


def parse_ack(er7: str) -> Ack:
    """Read an ACK; raises ValueError when it is not one."""
    try:
        ack = parse_message(er7.strip("\r\n"), find_groups=False)
        msa = ack.msa
        code = str(msa.msa_1.value)
        controlled = str(msa.msa_2.value)
        text = str(msa.msa_3.value) if msa.msa_3.value else ""
        errors = [str(e.to_er7()) for e in ack.children if e.name == "ERR"]
    except (HL7apyException, AttributeError, IndexError) as exc:
        raise ValueError(f"not an HL7 acknowledgment: {type(exc).__name__}") from exc
    return Ack(code, controlled, "; ".join(t for t in [text, *errors] if t))


def send_mllp(host: str, port: int, message: str, timeout_s: float) -> str:
    """Send one message over MLLP and return the answer (framing removed). Raises
    Unreachable when no whole answer comes within ``timeout_s``."""
    frame = START_BLOCK + message.encode("utf-8") + END_BLOCK
    try:
        with socket.create_connection((host, port), timeout=timeout_s) as sock:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.sendall(frame)
            received = b""
            while END_BLOCK not in received:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                received += chunk
                if len(received) > _MAX_ACK_BYTES:
                    raise Unreachable("the answer is larger than 1 MiB; not an ACK")
    except TimeoutError as exc:
        raise Unreachable(f"no ACK within {timeout_s:g} s") from exc
    except OSError as exc:
        raise Unreachable(f"{type(exc).__name__}: {exc}") from exc
    start = received.find(START_BLOCK)
    end = received.find(END_BLOCK)
    if start < 0 or end < 0 or end < start:
        raise Unreachable("the connection closed without a whole ACK")
    return received[start + 1 : end].decode("utf-8", errors="replace")


def deliver_hl7(
    facts: NotificationFacts, notifier: Hl7Notifier, now: datetime, timeout_s: float
) -> str:
    """Send the ORU and judge the ACK; returns the ACK code when accepted. Raises Refused
    (AE, AR, CE, CR) or Unreachable (no usable ACK)."""
    message = build_oru(facts, notifier, now)
    answer = send_mllp(notifier.host, notifier.port, message, timeout_s)
    try:
        ack = parse_ack(answer)
    except ValueError as exc:
        raise Unreachable(str(exc)) from exc
    if ack.control_id != control_id(facts):
        raise Unreachable(
            f"the ACK is for message {ack.control_id!r}, not {control_id(facts)!r}", ack.code
        )
    if ack.code in ("AA", "CA"):
        return ack.code
    if ack.code in ("AE", "AR", "CE", "CR"):
        detail = f": {ack.text}" if ack.text else ""
        raise Refused(f"HL7 {ack.code}{detail}"[:2000], ack.code)
    raise Unreachable(f"unknown acknowledgment code {ack.code!r}", ack.code)
