"""Client-level differential privacy (DP-FedAvg, McMahan et al. 2018): maths and accounting.

:mod:`.mechanism` holds the pure array maths (clipping, Gaussian noise on the mean, adaptive
clipping); :mod:`.accounting` turns a run's sampling and noise into an epsilon with
``dp-accounting``'s RDP accountant. The Flower-facing step is
:class:`feddistill.strategies.private.CentralPrivacy`; the design and its argument are in
docs/privacy.md.
"""
