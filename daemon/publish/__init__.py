"""Publishing results: a finished job's folder assembled beside the outbox and committed by one rename,
and reading a job's stdout and stderr wherever they are while it runs and after."""
