"""What stages notebook 03 and nothing else: the module's limiters as written
(:mod:`.as_written`), the plain locked bucket it teaches from (:mod:`.plain_bucket`), trace
replays (:mod:`.replay`), excerpts and one-panel-per-limiter charts (:mod:`.show`), the
live HTTP demo app (:mod:`.http_demo`) and a limiter on a local Redis Cluster
(:mod:`.cluster`). The code to copy into a service is in :mod:`course_lib.rate_limiting`.
"""
