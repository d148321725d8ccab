"""Loop policies over the server core: synchronous rounds and asynchronous events."""
