//! Usage in OpenAI Chat Completions and Responses answers, JSON and SSE.
