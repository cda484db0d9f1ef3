"""The reference point under pacs-agent in bench_reception.py: plain pynetdicom writing each
received data set's encoded bytes to a file (FACTS.md's fastest pynetdicom receiver), with no
fsync, no index and no checks.

    python bench/plain_scp.py PORT OUT_DIR
"""

from __future__ import annotations

import signal
import sys
import threading
from pathlib import Path
from typing import Any

from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt


def main() -> int:
    port, out = int(sys.argv[1]), Path(sys.argv[2])
    out.mkdir(parents=True, exist_ok=True)

    def store(event: Any) -> int:
        (out / f"{event.request.AffectedSOPInstanceUID}.dcm").write_bytes(event.encoded_dataset())
        return 0

    ae = AE(ae_title="PLAINSCP")
    ae.maximum_pdu_size = 131072
    for context in AllStoragePresentationContexts:
        if context.abstract_syntax is not None:
            ae.add_supported_context(context.abstract_syntax, ALL_TRANSFER_SYNTAXES)
    server = ae.start_server(
        ("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, store)]
    )
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    stop.wait()
    server.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
