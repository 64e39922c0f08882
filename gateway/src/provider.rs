//! The upstream providers and the client routes that imitate them.

use std::fmt;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Provider {
    Anthropic,
    OpenAi,
}

impl Provider {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Anthropic => "anthropic",
            Self::OpenAi => "openai",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "anthropic" => Some(Self::Anthropic),
            "openai" => Some(Self::OpenAi),
            _ => None,
        }
    }
}

impl fmt::Display for Provider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

// `Endpoint::ALL[i] as usize == i`, checked at compile time, so indexing an array by
// `endpoint as usize` cannot pick another endpoint's entry.
const _: () = {
    let mut i = 0;
    while i < Endpoint::ALL.len() {
        assert!(Endpoint::ALL[i] as usize == i);
        i += 1;
    }
};

/// A client route: which provider it speaks and how its usage is reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    Messages,
    CountTokens,
    ChatCompletions,
    Responses,
}

impl Endpoint {
    /// Every endpoint, in declaration order: `endpoint as usize` indexes arrays of this length.
    pub const ALL: [Endpoint; 4] = [
        Self::Messages,
        Self::CountTokens,
        Self::ChatCompletions,
        Self::Responses,
    ];

    pub fn provider(self) -> Provider {
        match self {
            Self::Messages | Self::CountTokens => Provider::Anthropic,
            Self::ChatCompletions | Self::Responses => Provider::OpenAi,
        }
    }

    /// The `endpoint` value of the usage event.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Messages => "messages",
            Self::CountTokens => "count_tokens",
            Self::ChatCompletions => "chat_completions",
            Self::Responses => "responses",
        }
    }

    /// Path on the upstream, below its API root.
    pub fn upstream_path(self) -> &'static str {
        match self {
            Self::Messages => "/v1/messages",
            Self::CountTokens => "/v1/messages/count_tokens",
            Self::ChatCompletions => "/v1/chat/completions",
            Self::Responses => "/v1/responses",
        }
    }
}
