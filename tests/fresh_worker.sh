#!/bin/sh
# torchrun's worker command in every multi-process launch of the suite (tests/conftest.launch): `python -u SCRIPT`
# as torchrun would start it, with a hash seed of its own per rank. A user's ranks each draw a random one; fixed
# distinct seeds make a set() that orders differently across ranks fail every time rather than most times.
PYTHONHASHSEED=$((RANK + 1)) exec "$REVIVAL_FRESH_PYTHON" -u "$@"
