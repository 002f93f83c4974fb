"""msr's feed -> retrain loop as an Apache Airflow 3 DAG, `msr_retrain`.

Every hour (params.yaml's `airflow.schedule`; no catch-up, one active run at a time):

1. **feed**: `msr-feed` (the feed stage: new tracks from Spotify), then `msr-loop signal`: the retrain signal
   (did the catalogue grow past `feed.retrain_threshold`?) and the registry's newest version and champion.
   A feed that did not feed (no Spotify credentials, Spotify failing) fails the task.
2. **retrain_signal**: a short-circuit: without the signal, `retrain` is skipped.
3. **retrain**: `msr-retrain --by airflow --push`: `dvc repro` (transform ... evaluate, and the register stage, which
   registers a new msr-recommender version and moves the champion alias to it only when it beats the champion); then,
   when the project has a default DVC remote, `dvc push`. It holds the retrain lock that the admin desk and
   `msr-feed --retrain` share, for its whole life: while another retrain runs it fails at once (exit code 3, "a retrain
   is already running (started by ...)") and is tried again after the retry delay.
4. **report**: `msr-loop report`: the champion, and an alert when the new version was not promoted (or none was
   registered). It also runs, and reports the champion, when the retrain was skipped.

A task that fails is tried again (`airflow.retries`, with a growing delay) and, after its last try, alerts through
`msr-loop alert`. An alert is always logged; `MSR_ALERT_URL` (a webhook, POSTed JSON) and `MSR_ALERT_COMMAND` (a shell
command, the alert's JSON on stdin) in the Airflow worker's environment send it on. Each task has a timeout.

Airflow runs in an environment of its own, without msr: this file imports neither msr nor anything of the project's
environment. Every step is a command of the project's environment (MSR_VENV, default <project>/.venv, first on PATH)
run in the project (MSR_PROJECT_DIR, default the folder above dags/). Secrets (Spotify, MLflow, the alert channels)
reach the steps only through the worker's environment, never through this file or the DAG's parameters.
"""
from __future__ import annotations

import json
import logging
import os
import shlex
import subprocess
from datetime import datetime, timedelta, timezone
from pathlib import Path

import yaml
from airflow.providers.standard.operators.bash import BashOperator
from airflow.sdk import dag, task

PROJECT = Path(os.environ.get("MSR_PROJECT_DIR") or Path(__file__).resolve().parents[1])
VENV = Path(os.environ.get("MSR_VENV") or PROJECT / ".venv")
try: SETTINGS = yaml.safe_load((PROJECT / "params.yaml").read_text())["airflow"]
except (OSError, KeyError, TypeError) as e:
    raise RuntimeError(f"msr_retrain needs the project's params.yaml with an airflow section, at {PROJECT} "
                       f"(MSR_PROJECT_DIR): {type(e).__name__}: {e}") from None

log = logging.getLogger(__name__)


def in_project(command: str) -> str:
    "A bash command run in the project with its environment's bin/ first on PATH."
    return f'export PATH={shlex.quote(str(VENV / "bin"))}:"$PATH"\n{command}'


def alert_failure(context):
    "After a task's last try: log, and hand the failure to `msr-loop alert` (the alert channels)."
    ti = context["ti"]
    failure = {"task_id": ti.task_id, "try_number": ti.try_number, "error": str(context.get("exception") or ""),
               "dag_id": ti.dag_id, "run_id": ti.run_id, "log_url": getattr(ti, "log_url", None)}
    log.error("msr_retrain: task %s failed after its last try (%s): %s", ti.task_id, ti.try_number, failure["error"])
    try:
        subprocess.run([str(VENV / "bin" / "msr-loop"), "alert"], input=json.dumps(failure), text=True, cwd=PROJECT,
                       timeout=SETTINGS["report_timeout"], check=True)
    except (OSError, subprocess.SubprocessError) as e:
        log.error("msr_retrain: msr-loop alert could not deliver the alert: %s", e)


@dag(dag_id="msr_retrain", schedule=SETTINGS["schedule"], start_date=datetime(2026, 1, 1, tzinfo=timezone.utc),
     catchup=False, max_active_runs=1, tags=["msr"], doc_md=__doc__,
     default_args={"retries": SETTINGS["retries"], "retry_delay": timedelta(seconds=SETTINGS["retry_delay"]),
                   "retry_exponential_backoff": float(SETTINGS["retry_backoff"]),
                   "max_retry_delay": timedelta(seconds=SETTINGS["max_retry_delay"]),
                   "execution_timeout": timedelta(seconds=SETTINGS["report_timeout"]),  # feed and retrain set their own
                   "on_failure_callback": alert_failure})
def msr_retrain():
    step = {"cwd": str(PROJECT), "skip_on_exit_code": None, "output_processor": json.loads}  # the last line is the step's JSON
    feed = BashOperator(task_id="feed", bash_command=in_project("msr-feed && msr-loop signal"),
                        execution_timeout=timedelta(seconds=SETTINGS["feed_timeout"]), **step)

    @task.short_circuit(ignore_downstream_trigger_rules=False)  # skips only the retrain: the report still runs
    def retrain_signal(signal: dict) -> bool:
        return bool(signal["retrain"])

    # under the one retrain lock; with a default DVC remote (a team's), the new data and model go there too, so every clone can `dvc pull` them
    retrain = BashOperator(task_id="retrain", bash_command=in_project("msr-retrain --by airflow --push"), cwd=str(PROJECT), skip_on_exit_code=None,
                           execution_timeout=timedelta(seconds=SETTINGS["retrain_timeout"]))
    report = BashOperator(task_id="report", bash_command=in_project('msr-loop report --signal "$MSR_LOOP_SIGNAL"'),
                          env={"MSR_LOOP_SIGNAL": "{{ ti.xcom_pull(task_ids='feed') | tojson }}"}, append_env=True,
                          trigger_rule="none_failed", **step)
    retrain_signal(feed.output) >> retrain >> report


msr_retrain()
