"""What stages notebook 04 and nothing else: the module's database code as written
(:mod:`.as_written`), the measurements the notebook charts (:mod:`.demos`,
:mod:`.several_replicas`), the servers it starts (:mod:`.replicas`: a primary with streaming
replicas; :mod:`.pgbouncer`). The code to copy into a service is in :mod:`course_lib.db`.
"""
