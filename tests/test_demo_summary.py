"""`make demo`'s report: both accuracies with the binomial standard error of one score, the chance level,
the gain with its paired standard error, and the task loss before the router loss."""
from examples.demo import summary


def test_the_demo_reports_accuracies_with_standard_errors_the_chance_level_and_the_paired_gain():
    golds = [0, 1, 0, 1, 0, 1, 0, 1]
    res = {"task": "piqa", "method": "gmoe",
           "zero_shot": {"predictions": [0, 0, 0, 0, 1, 1, 1, 1]},   # 4 of 8 right
           "finetuned": {"predictions": [0, 1, 0, 0, 1, 1, 0, 1]},   # 6 of 8: two gained, none lost
           "split": {"split_seed": 1234, "train_used": 200},
           "train": {"steps": 50, "seconds": 120.0, "log_history": [
               {"loss": 21.7, "task_loss": 4.31, "router_loss": 17.4}, {"loss": 11.2, "task_loss": 3.22,
                                                                        "router_loss": 8.0}, {"train_runtime": 1}]},
           "plots": {"loss": "loss.png"}}
    lines = summary(res, golds, chance=0.5)
    assert lines[0] == "piqa: 8 held-out examples (split seed 1234), trained on 200 (50 steps, 120 s)"
    assert lines[1] == "  chance             50.0 %"
    assert lines[2] == "  zero-shot          50.0 % (SE 17.7)"       # sqrt(.5 * .5 / 8)
    assert lines[3] == "  gmoe               75.0 % (SE 15.3)"       # sqrt(.75 * .25 / 8)
    # differences 0,1,0,0,0,0,1,0 -> mean 0.25, sample std sqrt(2/7 * 0.75^2 ... ) / sqrt(8)
    assert lines[4] == "  gain               +25.0 points (paired SE 16.4: 1.5 SE)"
    assert lines[5].startswith("  task loss          4.31 -> 3.22   (router loss 17.40 -> 8.00")  # 2nd half: 1 window
