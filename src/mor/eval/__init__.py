"""Evaluation: zero-shot multiple-choice scoring per task (``scoring``: lm-eval's rules, by
log-likelihood) and the evaluation of a model on a list of tasks, adapted or merged with fixed
routing (``tasks``). The lm-eval model type ``mor`` lives in ``mor.lm_eval_model``."""
