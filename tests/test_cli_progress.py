"""`jlora finetune`'s progress display: a tqdm bar on a terminal, plain lines off one; no JAX model needed."""

import io
import re

from jlora.cli.finetune import Progress


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_off_a_terminal_a_plain_line_every_n_steps_and_at_the_end():
    log = io.StringIO()
    progress = Progress(total=25, tokens_per_step=64, every=10, file=log)
    for step in range(1, 26):
        progress.update(step, 1.0 / step)
    progress.status("validation perplexity after: 3.000")
    lines = log.getvalue().splitlines()
    assert [int(re.match(r"step (\d+)/25", line).group(1)) for line in lines[:-1]] == [1, 10, 20, 25]
    assert lines[0] == "step 1/25  loss 1.0000  - tok/s  ETA ?"  # the first step compiles: no rate yet
    assert re.fullmatch(r"step 25/25  loss 0\.0400  [\d,]+ tok/s  ETA 00:00", lines[-2]), lines[-2]
    assert lines[-1] == "validation perplexity after: 3.000" and "\r" not in log.getvalue()


def test_on_a_terminal_one_tqdm_bar_with_step_loss_rate_and_eta():
    screen = Terminal()
    progress = Progress(total=3, tokens_per_step=64, file=screen)
    progress.update(1, 2.0)
    progress.status("compiling the train step ...")
    progress.update(2, 1.5)
    progress.update(3, 1.25)
    assert progress.bar is None  # closed at the last step
    final = screen.getvalue().split("\r")[-1]
    assert re.fullmatch(r"100%\|#+\| step 3/3 \[\d\d:\d\d<00:00, loss 1\.2500, [\d,]+ tok/s\]\n", final), repr(final)
    assert "compiling the train step ...\n" in screen.getvalue()
