"""Networks: every network is called as ``net(x, t)`` with ``t`` a float tensor ``[B]``."""
