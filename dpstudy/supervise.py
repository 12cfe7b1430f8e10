"""Run a command and write its exit status to a file: ``python -m dpstudy.supervise FILE CMD…``.

The app's launches outlive the app (and the app may be restarted), so the app cannot
always collect their exit status itself; this small parent does, and leaves it where
any later app session reads it. Standard library only, so it costs no start-up time.

SIGTERM and SIGINT reach the whole process group (a cancel): the command handles them
(a trainer records ``cancelled``) while this process keeps waiting to record how it ended.
"""

import os
import signal
import subprocess
import sys


def main(argv: list[str]) -> int:
    exit_file, command = argv[0], argv[1:]
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)  # caught, so reset to default in the child
    code = subprocess.Popen(command).wait()
    tmp = f"{exit_file}.tmp"
    with open(tmp, "w") as f:
        f.write(f"{code}\n")
    os.replace(tmp, exit_file)
    return code if code >= 0 else 128 - code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
