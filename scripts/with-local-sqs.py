"""Run a command against a local Amazon SQS: moto's server mode on 127.0.0.1.

    python scripts/with-local-sqs.py python manage.py demo      # make demo BROKER=sqs

Starts ``ThreadedMotoServer`` on 127.0.0.1 (port ``LOCAL_SQS_PORT``, default 4566, or a
free one if that is taken), runs the command with
``CELERY_BROKER_URL=sqs://demo:demo@127.0.0.1:<port>`` (recovery turns TLS off and picks a
region for a loopback host: docs/brokers.md), and stops the server when the command ends.
Everything SQS holds lives in this process's memory and is gone afterwards.

Against real AWS, set ``CELERY_BROKER_URL=sqs://`` (credentials and ``AWS_REGION`` from the
environment, as boto3 reads them) and run the command directly.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys


def _port() -> int:
    wanted = int(os.environ.get("LOCAL_SQS_PORT", "4566"))
    probe = socket.socket()
    try:
        probe.bind(("127.0.0.1", wanted))
    except OSError:
        probe.close()
        probe = socket.socket()
        probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    return port


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__, file=sys.stderr)
        return 2
    try:
        from moto.server import ThreadedMotoServer
    except ImportError:
        print("moto is not installed: pip install 'moto[server]' (requirements.txt has it)",
              file=sys.stderr)
        return 2
    port = _port()
    # One request log line per SQS call would bury the command's own output.
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    url = f"sqs://demo:demo@127.0.0.1:{port}"
    print(f"local SQS (moto) on 127.0.0.1:{port}: CELERY_BROKER_URL={url}", flush=True)
    try:
        return subprocess.call(argv, env={**os.environ, "CELERY_BROKER_URL": url})
    except KeyboardInterrupt:
        return 130
    finally:
        server.stop()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
