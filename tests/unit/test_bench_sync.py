"""bench.sync's table: each verdict is against the figure the issue names, and none is given without one."""

from __future__ import annotations

from bench.sync import Figures, table


def figures(tree: str, kind: str, **seconds: float) -> Figures:
    fig = Figures(tree=tree, target="a target", kind=kind, files=1000, used_bytes=1 << 30)
    for name, value in seconds.items():
        fig.add(name.replace("_", " "), value)
    fig.size("metadata", 1 << 20)
    fig.size("allocated", 1 << 30)
    return fig


def test_a_stage_row_judges_its_resync_and_the_synthetic_row_says_it_has_none() -> None:
    stage = figures("mail-200k by blocks", "mail server", stage=60, copy=30, verify=25, tar_pipe=35, dd=16,
                    dd_copy=20, resync=0.3, resync_list=3.6, resync_full=45)
    engine = figures("synthetic by blocks", "synthetic", stage=58, copy=25, verify=28, tar_pipe=31, dd=15,
                     dd_copy=20, resync_list=3.5, resync_full=44)
    text = table([stage, engine])
    mail, synthetic = text.split("mail-200k by blocks -> ")[1], text.split("synthetic by blocks -> ")[1]
    assert "copy / dd = 1.88 (target <= 2.00: ok)" in mail  # the mail server: the synthetic tree's target
    assert "no-change resync / stage = 0.005 (target <= 0.05: ok)" in mail and "by listings 0.060" in mail
    assert "no-change resync: no stage seal" in synthetic and "resync / stage" not in synthetic.split("\n")[2]
    assert "by listings 0.060" in synthetic
