#!/bin/sh
# Container health (HEALTHCHECK of deploy/docker/Dockerfile). HEALTHCHECK_MODE says what
# the container runs:
#   serve     the listener answers C-ECHO (`pacs-agent echo` to its own port); when the API
#             runs inside serve (HEALTHCHECK_API=1), GET /ready must answer 200 too
#   api       GET /ready answers 200 (the database and the broker are reachable)
#   worker    the settings load and the database and the broker answer (`pacs-agent config show`
#             would not touch them): a worker cut off from either cannot take or finish a job
#   none      always healthy
set -eu
ready() {
  python - "${PACS_AGENT_API__PORT:-8080}" <<'PY'
import sys
import urllib.request

url = f"http://127.0.0.1:{sys.argv[1]}/ready"
try:
    with urllib.request.urlopen(url, timeout=5) as rsp:
        sys.exit(0 if rsp.status == 200 else 1)
except Exception as exc:  # 503, refused, timeout
    print(f"{url}: {exc}", file=sys.stderr)
    sys.exit(1)
PY
}
case "${HEALTHCHECK_MODE:-serve}" in
  serve)
    pacs-agent echo --host 127.0.0.1 >/dev/null
    if [ "${HEALTHCHECK_API:-0}" = "1" ]; then ready; fi
    ;;
  api) ready ;;
  worker)
    python - <<'PY'
import sys

from kombu import Connection
from sqlalchemy import text

from pacs_agent.config import load_settings
from pacs_agent.db.session import make_engine

settings = load_settings()
engine = make_engine(settings.database_url)
with engine.connect() as conn:
    conn.execute(text("SELECT 1"))
engine.dispose()
if settings.broker_url is not None:
    with Connection(settings.broker_url, connect_timeout=5) as conn:
        conn.ensure_connection(max_retries=1)
sys.exit(0)
PY
    ;;
  none) ;;
  *) echo "unknown HEALTHCHECK_MODE=${HEALTHCHECK_MODE}" >&2; exit 1 ;;
esac
