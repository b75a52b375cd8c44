"""Programs' dependency environments: what a program declares (spec), how an environment is built on
the pool's interpreter (install), and the build queue that keeps builds off the job path (builder).

An environment is a virtualenv named by the hash of what determines it: the dependency list, the
requires-python bound, the interpreter and platform it is built for, and the index settings. It is
built once, under state/envs/<id>/, and every job and program with that hash shares it read-only.
"""
