"""Stdout callback of tests/roles/fake_hosts.py: one JSON document at the end, {"plays": [{"tasks":
[{"task": {"name"}, "hosts": {HOST: {"failed", "skipped", "changed", "msg"}}}]}]}, tasks in the order
they ran (handlers and included tasks too)."""

from __future__ import annotations

import json

from ansible.plugins.callback import CallbackBase

DOCUMENTATION = """
name: lab_record
type: stdout
short_description: the run as one JSON document, for tests
description: Tasks in execution order with each host's result (failed, skipped, changed, msg).
"""


class CallbackModule(CallbackBase):
    CALLBACK_VERSION = 2.0
    CALLBACK_TYPE = "stdout"
    CALLBACK_NAME = "lab_record"

    def __init__(self):
        super().__init__()
        self.plays: list[dict] = []

    def v2_playbook_on_play_start(self, play):
        self.plays.append({"play": {"name": play.get_name()}, "tasks": []})

    def _start(self, task):
        self.plays[-1]["tasks"].append({"task": {"name": task.get_name()}, "hosts": {}})

    v2_playbook_on_task_start = v2_playbook_on_handler_task_start = lambda self, task, *a, **k: self._start(task)

    def _record(self, result, **state):
        res = result._result
        host = result._host.get_name()
        entry = self.plays[-1]["tasks"][-1]["hosts"].setdefault(host, {"failed": False, "skipped": True, "changed": False})
        if state.get("skipped") and not entry["skipped"]:
            return  # a loop with some items skipped
        entry.update(skipped=bool(state.get("skipped")), changed=entry["changed"] or bool(res.get("changed")))
        if state.get("failed"):
            entry.update(failed=True, msg=str(res.get("msg", "")))

    def v2_runner_on_ok(self, result):
        self._record(result)

    def v2_runner_on_failed(self, result, ignore_errors=False):
        self._record(result, failed=not ignore_errors)

    def v2_runner_on_skipped(self, result):
        self._record(result, skipped=True)

    def v2_runner_on_unreachable(self, result):
        self._record(result, failed=True)

    def v2_playbook_on_stats(self, stats):
        self._display.display(json.dumps({"plays": self.plays}))
