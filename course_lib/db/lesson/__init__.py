"""What stages notebook 04 and nothing else: the module's database code as written
(:mod:`.as_written`) and the measurements the notebook charts (:mod:`.demos`). The code to
copy into a service is in :mod:`course_lib.db`.
"""
