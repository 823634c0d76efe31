"""durable_heap benchmarks.

``python -m benchmarks [--quick] [--only W] [--sizes N,..] [--json PATH] [--report]``
"""
