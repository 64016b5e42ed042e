import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402

from ddpm_schedules.reports.plots import plot_bpd_vs_budget, plot_fd_vs_budget  # noqa: E402


def _quality(fids: dict[str, dict[int, float]]) -> list[dict]:
    return [
        {"strategy": n, "sampler": "ddim", "K": k, "fid": v, "fid_sem": 1.0}
        for n, by_k in fids.items()
        for k, v in by_k.items()
    ]


def _yscale(fig) -> str:
    scale = fig.axes[0].get_yscale()
    plt.close(fig)
    return scale


def test_a_baseline_far_above_the_others_puts_the_plots_on_a_log_axis():
    close = {"dp": {8: 2.04, 16: 1.87}, "even": {8: 4.37, 16: 3.83}}
    assert _yscale(plot_bpd_vs_budget(close)) == "linear"
    assert _yscale(plot_bpd_vs_budget(close | {"karras": {8: 10.07, 16: 4.29}})) == "log"
    assert (
        _yscale(
            plot_fd_vs_budget(
                _quality({"dp_ode": {4: 75.9, 8: 13.6}, "karras": {4: 547.4, 8: 199.5}}), "ddim", "digits"
            )
        )
        == "log"
    )


def test_a_distance_of_zero_keeps_the_linear_axis():
    assert _yscale(plot_fd_vs_budget(_quality({"dp": {4: 0.0, 8: 50.0}}), "ddim", "digits")) == "linear"
