"""Graders and the benchmark registry (installed as ``aropd.evaluators``)."""
