"""Numerical building blocks below the providers and schedules: the log-sum-exp merge of partial attention
results, the float32 sums of a ring backward's gradient parts, and their optional Triton kernels."""
