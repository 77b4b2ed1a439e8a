#!/usr/bin/env python
"""Materialize a dual-view training set: `python scripts/materialize.py {math,code,medical} --out FILE.jsonl ...`.

The logic (and every rule for splitting a row into question, reasoning and answer) lives in
`aropd/materialize.py`; `--help` lists the options.
"""

import sys

from aropd.materialize import main

if __name__ == "__main__":
    sys.exit(main())
