"""The training loop shared by teacher training, ``finetune``, ``distill`` and QAT.

``fit(model, objective, data, config, workdir, device=...)`` trains in place and returns a
``FitResult``; objectives (``edgekd.train.objectives``) define the loss.
"""
