# The two commands of the README. Each installs what it needs first.
.PHONY: sweep test bench

sweep:
	scripts/setup.sh
	.venv/bin/bitsweep run

test:
	scripts/setup.sh dev
	.venv/bin/python -m pytest -n 2 --dist loadfile  # two worker processes, each test file in one of them

bench:
	scripts/setup.sh dev
	.venv/bin/python bench/quantize.py
	.venv/bin/python bench/kernels.py
