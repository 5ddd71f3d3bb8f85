"""The PV Access front-end (``carelay pva``): p4p over the same shards as the CA brokers.

Its own process, never with pcaspy: two EPICS libraries in one process are a known
source of crashes.  See front.py for how it is put together.
"""
