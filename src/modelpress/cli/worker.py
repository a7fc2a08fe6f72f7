"""The child process of `modelpress run`: one stage or one measurement of a recipe
(see :mod:`modelpress.pipeline.run`). Not a command users type.

Usage: python -m modelpress.cli.worker JOB.json RESULT.json
"""

from __future__ import annotations

import json
import logging
import signal
import sys
from pathlib import Path

from modelpress.cli import interrupt, os_error, quiet_third_party  # sets TQDM_DISABLE before torch loads
from modelpress.errors import UserError
from modelpress.record import to_json


def main(argv: list[str] | None = None) -> int:
    job_file, result_file = argv if argv is not None else sys.argv[1:]
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    quiet_third_party()
    signal.signal(signal.SIGTERM, interrupt)
    from modelpress.pipeline.jobs import run_job

    job = json.loads(Path(job_file).read_text())
    try:
        result, code = {"result": run_job(job)}, 0
    except UserError as e:
        result, code = {"error": str(e)}, 2
    except OSError as e:
        result, code = {"error": os_error(e)}, 2
    except KeyboardInterrupt:
        return 130
    tmp = Path(f"{result_file}.tmp")
    tmp.write_text(to_json(result))
    tmp.replace(result_file)
    return code


if __name__ == "__main__":
    sys.exit(main())
