"""pdserve's test harness, importable by the tests and the benchmarks alike (installed with the
project from tests/): `harness` starts real pdserve processes on free loopback ports and makes
small models; `engines` steps an in-process engine to its greedy tokens; `waits` holds the
bounded waits that stand in for no event."""
