#!/bin/sh
# torchrun's worker command in the suite (tests/zygote_worker.py): an interpreter without site-packages starts in
# milliseconds.
exec "$REVIVAL_ZYGOTE_PYTHON" -I -S "$(dirname "$0")/zygote_worker.py" "$@"
