"""Intake: how a job enters dropq. The watcher sees files arrive in the inbox, the claim takes a complete
manifest (and its inputs) by rename, and the manifest is read and validated as untrusted bytes."""
