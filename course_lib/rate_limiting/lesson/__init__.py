"""What stages notebook 03 and nothing else: the module's limiters as written
(:mod:`.as_written`), trace replays (:mod:`.replay`), staged races (:mod:`.races`) and the
live HTTP demo app (:mod:`.http_demo`). The code to copy into a service is in
:mod:`course_lib.rate_limiting`.
"""
