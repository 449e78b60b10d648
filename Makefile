# Every target installs what it needs first: a fresh machine runs `make demo` or `make test` and nothing else.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
FMNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
DEMO   := runs/demo-$(shell date +%Y%m%d-%H%M%S)

.PHONY: setup demo test test-avx2-paths test-slow docs clean-venv

setup: $(STAMP) $(FMNIST)

# torch is pinned by constraints.txt on every pip call: an unpinned one pulls a multi-GB CUDA build. The editable
# install is -qq: setuptools' note about its import finder (plugins/ maps to qtoolkit_plugins) is not a user's
# concern; errors still show.
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip -c constraints.txt
	$(BIN)/pip install -q -c constraints.txt torch==2.13.0
	$(BIN)/pip install -qq -c constraints.txt -e '.[test,docs,int8,peers]'
	touch $(STAMP)

$(FMNIST):
	bash scripts/install-dataset.sh

# The main job, as a recipe: W8A8 post-training quantization of the bundled model with NDTC, exported to the
# fastest int8 backend here, and its report against FP.
demo: setup
	$(BIN)/qtoolkit run recipes/ddim_fmnist_w8a8.yaml --out $(DEMO)

# Three stages: the suite (the import-layer contracts included: tests/test_layers.py); the documentation site (a
# broken link or anchor fails); then the suite's int8 tests again with fbgemm and oneDNN (PyTorch's and OpenVINO's)
# forced onto their AVX2 code, whose int8 products saturate without VNNI: a VNNI or AMX machine then catches what
# an AVX2 user would get (qtoolkit.quant.overflow). ONNX Runtime has no such switch; on a real AVX2 CPU the stages
# agree.
test: setup
	$(BIN)/python -m pytest -q
	$(MAKE) docs
	$(MAKE) test-avx2-paths

# The documentation site (mkdocs.yml), built into build/site; --strict: any warning fails.
docs: setup
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --quiet

test-avx2-paths: setup
	FBGEMM_ENABLE_INSTRUCTIONS=AVX2 ONEDNN_MAX_CPU_ISA=AVX2 $(BIN)/python -m pytest -q -m "avx2_paths and not slow"

test-slow: setup
	$(BIN)/python -m pytest -q -m slow

clean-venv:
	rm -rf $(VENV)
