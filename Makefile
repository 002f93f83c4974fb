# msr — one entry point for people and CI.
#   make run        set up .venv and run the whole pipeline (dvc repro)
#   make run-offline the same, reading the shipped archive (MSR_OFFLINE=1; params.yaml and dvc.lock stay as they are)
#   make test       set up .venv, check notebooks and library are in sync, ruff, nbdev_test and pytest
#   make serve      serve the registered champion over REST (msr-serve) on 127.0.0.1
#   make dashboard  the voila dashboard on 127.0.0.1 (token-protected; the URL with its token is printed)
#   make hub        JupyterHub on 127.0.0.1: accounts (signup, admin approval) and the dashboard as its service
#   make airflow    Apache Airflow 3 in its own venv (.airflow/) for the feed -> retrain DAG (dags/msr_retrain.py)
#   make mlflow-server  a shared MLflow tracking server for a team: PostgreSQL, basic auth, proxied artifacts (README: Team mode)
#   make bench      run the benchmarks (figures for BENCHMARKS.md; needs a finished `make run`, and wrk: apt-get install wrk)
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.msr-installed
export PATH := $(abspath $(BIN)):$(PATH)
HOST ?= 127.0.0.1
DASHBOARD_PORT ?= 8866

.PHONY: setup constraints run run-offline test sync-check lint export clean-nbs readme nbtest pytest lab bench mlflow-ui serve dashboard hub hub-proxy airflow airflow-try airflow-standalone mlflow-server

setup: $(STAMP)

# constraints.txt pins every package to the versions dvc.lock and the metrics were written with (a newer library moved
# the ranker's training rows by 1.2 %, beyond reproduce.tolerances); refresh it after changing settings.ini's requirements
# (it installs the newest versions settings.ini allows, then records them: run make run-offline and the tests after it)
constraints:
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade -e '.[dev]'
	{ sed -n '1,/^[^#]/{/^#/p}' constraints.txt; $(BIN)/python -m pip freeze --exclude-editable; } > constraints.txt.new
	mv constraints.txt.new constraints.txt
	touch $(STAMP)

$(STAMP): settings.ini setup.py constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev]'
	$(BIN)/python -m ipykernel install --sys-prefix --name python3 --display-name "Python 3 (msr)" >/dev/null
	@test -d .dvc || $(BIN)/dvc init --quiet
	touch $(STAMP)

# The register stage declares no DVC outputs (its product is the registry entry), so DVC skips it while its inputs are
# unchanged, as in a fresh clone whose dvc.lock says it ran: right for a team's registry, which holds the version already.
# A registry with no champion (a fresh clone's own mlflow.db) gets this model registered after the pipeline.
define REGISTER_IF_NO_CHAMPION
	@rc=0; $(BIN)/python -c "import sys; from msr.registry import champion_version; sys.exit(0 if champion_version() else 3)" || rc=$$?; \
	if [ $$rc = 3 ]; then echo "msr: the registry has no champion yet: registering this model (dvc repro --force --single-item register)"; \
	  $(1) $(BIN)/dvc repro --force --single-item register; \
	elif [ $$rc != 0 ]; then echo "msr: could not ask the registry for its champion (see above)"; exit $$rc; fi
endef

run: setup
	$(BIN)/dvc repro
	$(call REGISTER_IF_NO_CHAMPION)

# Same pipeline without touching the network: reads ingest.offline_source (the shipped archive). The route is the
# environment's, not a parameter: sha256 pins the same bytes either way, so params.yaml and dvc.lock do not change.
run-offline: setup
	MSR_OFFLINE=1 $(BIN)/dvc repro
	$(call REGISTER_IF_NO_CHAMPION,MSR_OFFLINE=1)

export: setup
	$(BIN)/nbdev_export

clean-nbs: setup
	$(BIN)/nbdev_clean

readme: setup
	$(BIN)/python -c 'from msr.docs import render_readme; render_readme()'

# Fails (after fixing the files in place) when nbdev_export, nbdev_clean or the README
# generator would change anything: the generated files must be committed in sync.
sync-check: setup
	@before=$$(find msr nbs README.md -type f \( -name '*.py' -o -name '*.ipynb' -o -name '*.md' \) -not -path '*/.ipynb_checkpoints/*' | sort | xargs md5sum); \
	$(BIN)/nbdev_export && $(BIN)/nbdev_clean && $(BIN)/python -c 'from msr.docs import render_readme; render_readme()' && \
	after=$$(find msr nbs README.md -type f \( -name '*.py' -o -name '*.ipynb' -o -name '*.md' \) -not -path '*/.ipynb_checkpoints/*' | sort | xargs md5sum); \
	if [ "$$before" != "$$after" ]; then \
	  echo "sync-check: nbdev_export / nbdev_clean / README generation changed these files:"; \
	  diff <(echo "$$before") <(echo "$$after") | grep '^[<>]' | awk '{print "  " $$3}' | sort -u; \
	  echo "Run 'make export clean-nbs readme' and commit the result."; exit 1; fi
	@echo "sync-check: notebooks, library and README are in sync"

# pyflakes and pycodestyle errors over the library, the notebooks, the tests and the benchmarks (rules in pyproject.toml)
lint: setup
	$(BIN)/ruff check msr nbs tests benchmarks dags

nbtest: setup
	$(BIN)/nbdev_test --n_workers 2

pytest: setup hub-proxy airflow-try
	$(BIN)/python -m pytest

test: sync-check lint nbtest pytest

lab: setup
	$(BIN)/jupyter lab

# the embedded store's UI; its own port, so it runs beside make mlflow-server (team.port 5000) and make serve (5001)
MLFLOW_UI_PORT ?= 5002
mlflow-ui: setup
	$(BIN)/mlflow ui --backend-store-uri sqlite:///mlflow.db --host 127.0.0.1 --port $(MLFLOW_UI_PORT)

# A team's shared MLflow server (msr-team server; params.yaml's team section): runs, registry and users in PostgreSQL (a cluster
# made in data/team/postgres on 127.0.0.1, or team.database_url), artifacts proxied to team.artifacts, basic auth whose admin
# password is MLFLOW_AUTH_ADMIN_PASSWORD (12+ characters). In the foreground: Ctrl-C stops it, and the local PostgreSQL when it
# started it (a cluster started by `msr-team db start` keeps running: `msr-team db stop`). Users: .venv/bin/msr-team user add NAME --role reader|promoter
mlflow-server: setup
	$(BIN)/msr-team server

# The registry's champion behind msr's strict REST front, msr-serve, configured by params.yaml's serve section
# (SERVE_HOST, SERVE_PORT, SERVE_WORKERS, SERVE_HUB override it). Beyond loopback it needs API keys: `.venv/bin/msr-keys add NAME`.
serve: setup
	MLFLOW_TRACKING_URI=$${MLFLOW_TRACKING_URI:-sqlite:///mlflow.db} $(BIN)/msr-serve $(if $(SERVE_HOST),--host $(SERVE_HOST)) \
	  $(if $(SERVE_PORT),--port $(SERVE_PORT)) $(if $(SERVE_WORKERS),--workers $(SERVE_WORKERS)) $(if $(SERVE_HUB),--hub $(SERVE_HUB))

# The dashboard: code hidden, Jupyter token auth. The token (MSR_DASHBOARD_TOKEN, or a file named by
# MSR_DASHBOARD_TOKEN_FILE, or a fresh random one) reaches voila through its environment, never its
# command line, which any local user can read in /proc. Its pages hold no model: they ask the REST service
# (MSR_API_URL, default http://127.0.0.1:<SERVE_PORT, else params.yaml's serve.port>), started here (`make serve`) when it does not answer
# /health and msr-serve is installed, and stopped with the dashboard. msr.pages limits the open pages and
# culls their kernels (params.yaml's dashboard section).
DASHBOARD_API = $${MSR_API_URL:-http://127.0.0.1:$(or $(SERVE_PORT),$$($(BIN)/python -c "from msr.core import load_params; print(load_params(section='serve')['port'])"))}
# ok / refused (it answers but refuses MSR_API_KEY, or the lack of one) / down; the key travels in the environment, never in argv
API_STATE = $(BIN)/python -m msr.app health

# Start the REST service the dashboard's pages ask (as `make serve` does) when none answers $$api/health and none was named.
define ENSURE_API
api=$(DASHBOARD_API); state=$$($(API_STATE) $$api || echo down); \
	if [ "$$state" = down ]; then \
	  if [ -z "$${MSR_API_URL:-}" ] && [ -x $(BIN)/msr-serve ]; then \
	    echo "msr $@: no REST service answers $$api/health; starting one (make serve SERVE_HOST=127.0.0.1)"; \
	    setsid $(MAKE) --no-print-directory serve SERVE_HOST=127.0.0.1 & serve_pid=$$!; \
	    trap 'kill -- -'$$serve_pid' 2>/dev/null' EXIT INT TERM; \
	    for i in $$(seq 180); do state=$$($(API_STATE) $$api || echo down); [ "$$state" != down ] && break; sleep 1; done; \
	    [ "$$state" != down ] || { echo "msr $@: the REST service did not come up on $$api"; exit 1; }; \
	  else echo "msr $@: no REST service answers $$api/health. Start it first (make serve, in another terminal)," \
	    "or point MSR_API_URL at one."; exit 1; fi; fi; \
	if [ "$$state" = refused ]; then echo "msr $@: the REST service at $$api refuses" \
	  "$$(if [ -n "$${MSR_API_KEY:-}" ]; then echo the key in MSR_API_KEY; else echo requests without a key; fi): set MSR_API_KEY to a key it accepts" \
	  "(msr-keys add NAME in its project, or a JupyterHub API token when it serves a hub)"; exit 1; fi; \
	export MSR_API_URL=$$api
endef

dashboard: setup
	@$(ENSURE_API); \
	if [ -n "$${MSR_DASHBOARD_TOKEN_FILE:-}" ]; then export JUPYTER_TOKEN_FILE="$$MSR_DASHBOARD_TOKEN_FILE"; \
	  echo "msr dashboard: http://$(HOST):$(DASHBOARD_PORT)/?token=<the token in $$MSR_DASHBOARD_TOKEN_FILE>"; \
	else export JUPYTER_TOKEN="$${MSR_DASHBOARD_TOKEN:-$$($(BIN)/python -c 'import secrets; print(secrets.token_urlsafe(24))')}"; \
	  echo "msr dashboard: http://$(HOST):$(DASHBOARD_PORT)/?token=$$JUPYTER_TOKEN"; fi; \
	$(BIN)/voila nbs/dashboard.ipynb --no-browser --strip_sources=True --Voila.ip=$(HOST) --port=$(DASHBOARD_PORT) --Voila.auto_token=True \
	  $$($(BIN)/python -c 'from msr.pages import VOILA_ARGS; print(*VOILA_ARGS)')

# configurable-http-proxy, the hub's proxy, from the npm registry into the project (.hub/, gitignored), never globally.
# `hub-proxy` tries and goes on without it (the hub's tests then skip and say why); `make hub` needs it.
CHP_VERSION := 5.3.0
HUB_PROXY := .hub/node_modules/.bin/configurable-http-proxy
$(HUB_PROXY):
	npm install --prefix .hub --no-fund --no-audit --loglevel=error configurable-http-proxy@$(CHP_VERSION)

hub-proxy:
	@test -x $(HUB_PROXY) || $(MAKE) --no-print-directory $(HUB_PROXY) || \
	  echo "make: configurable-http-proxy could not be installed from npm: the hub's tests will be skipped"

# JupyterHub (msr.hub.configure via jupyterhub_config.py; settings in params.yaml's hub section) with the dashboard as its
# service, everything on 127.0.0.1; people open http://127.0.0.1:<hub.port>/, sign up, and the admin approves them at /hub/authorize.
# The first admin (MSR_HUB_ADMIN, else hub.admin) is made at the first start; its password comes from MSR_HUB_ADMIN_PASSWORD or a
# 0600 file named by MSR_HUB_ADMIN_PASSWORD_FILE, else msr writes a new one to <hub.state>/admin-password (0600) and says so.
# The REST service is found or started as for `make dashboard`.
hub: setup $(HUB_PROXY)
	@$(ENSURE_API); \
	$(BIN)/jupyterhub -f jupyterhub_config.py

bench: setup
	$(BIN)/python benchmarks/pipeline.py --runs 5
	$(BIN)/python benchmarks/recommend.py --fits 3 --queries 1000
	$(BIN)/python benchmarks/split_seeds.py --seeds 42 1 2
	$(BIN)/python benchmarks/scale.py --tracks 30000 100000 300000 1000000
	$(BIN)/python benchmarks/monitor.py --gb 1 --full-gb 0.1 --runs 5
	$(BIN)/python benchmarks/dashboard.py --runs 5
	$(BIN)/python benchmarks/hub.py --runs 5
	$(BIN)/python benchmarks/serve.py --runs 5 --seconds 15 --connections 8 1
	$(BIN)/python benchmarks/team.py --runs 5

# Apache Airflow for the feed -> retrain DAG (dags/msr_retrain.py), in a venv of its own: the DAG reaches msr through the
# project's .venv. The venv is built once per machine under $XDG_CACHE_HOME/msr/ (else ~/.cache/msr/), keyed by the
# Airflow version and Python, and linked as .airflow/venv; .airflow/ (gitignored) is this project's AIRFLOW_HOME. Its
# airflow.cfg, written once (0600), names the DAG folder, binds the UI to 127.0.0.1 and holds the secrets Airflow's
# processes share. apache-airflow[postgres], so AIRFLOW__DATABASE__SQL_ALCHEMY_CONN may name the team's PostgreSQL.
AIRFLOW_VERSION := 3.3.2
AIRFLOW_HOME_DIR := .airflow
AIRFLOW_BIN := $(AIRFLOW_HOME_DIR)/venv/bin
AIRFLOW_CACHE = $${XDG_CACHE_HOME:-$$HOME/.cache}/msr/airflow-$(AIRFLOW_VERSION)-py$$($(PYTHON) -c 'import sys; print("%d.%d" % sys.version_info[:2])')
AIRFLOW_ENV = AIRFLOW_HOME=$(CURDIR)/$(AIRFLOW_HOME_DIR) AIRFLOW__CORE__DAGS_FOLDER=$(CURDIR)/dags

airflow:
	@set -e; venv=$(AIRFLOW_CACHE); \
	if [ ! -f $$venv/.msr-complete ]; then \
	  mkdir -p "$$(dirname $$venv)"; \
	  ( flock 9; if [ ! -f $$venv/.msr-complete ]; then \
	      echo "make airflow: installing apache-airflow[postgres]==$(AIRFLOW_VERSION) into $$venv"; \
	      rm -rf $$venv; $(PYTHON) -m venv $$venv; \
	      $$venv/bin/python -m pip install --quiet --upgrade pip; \
	      $$venv/bin/python -m pip install --quiet 'apache-airflow[postgres]==$(AIRFLOW_VERSION)'; \
	      touch $$venv/.msr-complete; fi ) 9>$$venv.lock; \
	fi; \
	mkdir -p $(AIRFLOW_HOME_DIR); chmod 700 $(AIRFLOW_HOME_DIR); ln -sfn $$venv $(AIRFLOW_BIN:/bin=); \
	if [ ! -f $(AIRFLOW_HOME_DIR)/airflow.cfg ]; then \
	  secret() { $(AIRFLOW_BIN)/python -c 'import secrets; print(secrets.token_urlsafe(32))'; }; \
	  (umask 077; printf '%s\n' "# msr's AIRFLOW_HOME (make airflow); Airflow's defaults hold for everything not set here" \
	    '[core]' "dags_folder = $(CURDIR)/dags" 'load_examples = False' \
	    '# msr_retrain runs one task at a time; the LocalExecutor forks this many workers at its start (default 32)' 'parallelism = 4' \
	    '[api]' 'host = 127.0.0.1' "secret_key = $$(secret)" '[api_auth]' "jwt_secret = $$(secret)" > $(AIRFLOW_HOME_DIR)/airflow.cfg); \
	fi; \
	echo "make airflow: Airflow $$($(AIRFLOW_BIN)/python -c 'from importlib.metadata import version; print(version("apache-airflow"))') in $(AIRFLOW_HOME_DIR)/venv -> $$venv; AIRFLOW_HOME=$(AIRFLOW_HOME_DIR)"

# `airflow-try` tries and goes on without it (the Airflow tests then skip and say why); `make airflow` must succeed.
airflow-try:
	@$(MAKE) --no-print-directory airflow || \
	  echo "make: Airflow could not be installed (make airflow): the Airflow tests will be skipped"

# Everything in one process tree for trying it out, the metadata DB in .airflow/airflow.db (SQLite): the UI on
# http://127.0.0.1:8080, the admin's password in .airflow/simple_auth_manager_passwords.json.generated. standalone starts
# its parts as `airflow ...` from PATH, so Airflow's bin/ goes first on it. Unpause msr_retrain to let it run hourly.
airflow-standalone: airflow
	$(AIRFLOW_ENV) PATH=$(CURDIR)/$(AIRFLOW_BIN):$$PATH airflow standalone
