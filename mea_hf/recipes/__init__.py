"""End-to-end recipes built from the libraries: the quickstart and the pretrain -> compress -> recover -> measure
pipeline it shares with `benchmarks/bench_compress.py`."""
