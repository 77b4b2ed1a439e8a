"""Experiments on top of the library: grids of runs, their bookkeeping and tables, the CPU method study
and the toy base model's pretraining. ``scripts/`` holds their command lines."""
