# The two commands the README opens with. Both run the (idempotent) set-up first.
.PHONY: setup quickstart test

setup:
	bash setup.sh

# Pipeline 1 in small mode: real SmolLM2 teacher -> cache -> students -> report.
quickstart: setup
	python3 pipelines/causal_lm.py --small

test: setup
	python3 -m pytest -q tests
