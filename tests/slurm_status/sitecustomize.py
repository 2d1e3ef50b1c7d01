"""For the SLURM workflow test only (tests/test_slurm.py puts this folder on PYTHONPATH).

The executor plugin waits 10 s longer before each status query in which no job finished, up to
180 s: that is hard-coded, not a setting. The test cluster's jobs take seconds, so that back-off
leaves the test waiting on jobs that finished long before. Here the wait stays at the profile's
`slurm-init-seconds-before-status-checks` (profiles/slurm-ci). Nothing else about the plugin
changes. The patch is applied only when a process imports the plugin; other processes that
inherit PYTHONPATH (the jobs) only get a finder that does nothing else.
"""

import importlib.abc
import importlib.machinery
import sys

PLUGIN = "snakemake_executor_plugin_slurm"


class _FixedInterval:
    """``next_seconds_between_status_checks``: always the initial interval (setting it is ignored)."""

    def __get__(self, executor, owner=None):
        if executor is None:
            return self
        return getattr(executor.workflow.executor_settings, "init_seconds_before_status_checks", 40)

    def __set__(self, executor, value):
        pass


class _PatchOnImport(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name != PLUGIN:
            return None
        sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return spec
        execute = spec.loader.exec_module

        def exec_module(module):
            execute(module)
            module.Executor.next_seconds_between_status_checks = _FixedInterval()

        spec.loader.exec_module = exec_module
        return spec


sys.meta_path.insert(0, _PatchOnImport())
