//! Authentication: registered API clients (secrets stored hashed) and the appliance's own
//! short-lived JWT access tokens (EdDSA), issued at `/auth/token` and checked on every request.

pub mod assertions;
pub mod clients;
pub mod external;
pub mod outbound;
pub mod token_keys;
pub mod tokens;

pub use clients::{ClientRegistration, Clients, NewClient};
pub use tokens::{TokenError, TokenIssuer};
