"""The queue: the job store (SQLite, with its numbered migrations), the job states and their allowed
transitions, and the balancer that hands ready jobs to idle workers."""
