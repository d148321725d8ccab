"""Byzantine-robust aggregation: strategies that look at each update on its own.

Unlike FedAvg, these cannot fold updates into a running sum (nor run under secure
aggregation, which reveals only the sum): each needs the round's individual updates.
The arithmetic lives in `robust_math.py`; each strategy is a thin `Strategy` around it.
"""
