"""Export family: the journal, from a persisted cursor, into NATS JetStream."""
