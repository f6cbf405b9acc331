"""What each kind of relay process imports, since every module a process
imports stays in its memory (issue 16: idle RSS of the whole relay).

The event-loop process (`relay serve`) names the pipeline's steps but never
runs them, so it must not load the sanitizer's and link finder's libraries;
a worker runs them but none of the pool's asyncio side. Each check runs in
a fresh interpreter, as the processes start."""

from __future__ import annotations

import json
import subprocess
import sys

PIPELINE_LIBRARIES = ["bleach", "bleach._vendor.html5lib", "tinycss2", "linkify_it", "relay.pipeline.runner",
                      "relay.pipeline.sanitize", "relay.pipeline.links"]


def imported_after(code: str, names: list[str]) -> list[str]:
    probe = (f"import json, sys\n{code}\n"
             f"print(json.dumps([n for n in {names!r} if n in sys.modules]))")
    done = subprocess.run([sys.executable, "-P", "-c", probe], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_the_event_loop_process_does_not_load_the_pipeline_libraries():
    assert imported_after("import relay.cli, relay.server, relay.handler, relay.bounces", PIPELINE_LIBRARIES) == []


def test_naming_the_pipeline_types_does_not_load_the_stages():
    # What the handler builds and reads back: the package's own module.
    assert imported_after("from relay.pipeline import BEGIN, FINISH, Begun, Context, Processed, Result",
                          PIPELINE_LIBRARIES) == []


def test_the_stages_load_on_first_use_of_the_steps():
    assert imported_after("from relay import pipeline\npipeline.begin", PIPELINE_LIBRARIES) == PIPELINE_LIBRARIES


def test_a_worker_process_does_not_load_asyncio():
    code = ("import relay.worker_process\nfrom relay.pipeline import runner\n"
            "runner.begin(relay.worker_process.READY_CHECK)\nimport relay.dkim")
    assert imported_after(code, ["asyncio", "relay.workers", "aiosqlite", "aiosmtpd"]) == []
