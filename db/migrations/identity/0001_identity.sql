-- Identity service: the single source of truth for email addresses, people, credentials,
-- roles, sessions, KYC and service API keys (docs/IDENTITY.md).

-- The global email registry. Other services hold only `id` (003: no copied emails).
-- Addresses are normalised by the application (NFKC, trimmed, lower-cased); the CHECK
-- makes a missed normalisation fail loudly instead of creating a case-variant duplicate.
CREATE TABLE identity.email_addresses (
    id uuid PRIMARY KEY,
    email text NOT NULL,
    verified_at timestamptz,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT email_normalised CHECK (email = lower(btrim(email)) AND length(email) BETWEEN 3 AND 254)
);
CREATE UNIQUE INDEX email_addresses_email_key ON identity.email_addresses (email);

-- Credentials. `kind` keeps platform staff apart from customers: staff roles
-- (support, auditor, admin) can only be held by platform users.
CREATE TABLE identity.users (
    id uuid PRIMARY KEY,
    email_address_id uuid NOT NULL UNIQUE REFERENCES identity.email_addresses (id),
    kind text NOT NULL CHECK (kind IN ('customer', 'platform')),
    password_hash text NOT NULL,
    status text NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'disabled')),
    kyc_status text NOT NULL DEFAULT 'none' CHECK (kyc_status IN ('none', 'pending', 'approved', 'rejected')),
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX users_created ON identity.users (created_at, id);

-- People (003's human_names): names and the optional username.
CREATE TABLE identity.people (
    user_id uuid PRIMARY KEY REFERENCES identity.users (id) ON DELETE CASCADE,
    first_name text,
    surname text,
    username text,
    updated_at timestamptz NOT NULL DEFAULT now()
);
CREATE UNIQUE INDEX people_username_key ON identity.people (lower(username)) WHERE username IS NOT NULL;

CREATE TABLE identity.mobile_numbers (
    user_id uuid PRIMARY KEY REFERENCES identity.users (id) ON DELETE CASCADE,
    phone text NOT NULL CHECK (phone ~ '^\+[1-9][0-9]{6,14}$'),
    verified_at timestamptz,
    updated_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE identity.user_roles (
    user_id uuid NOT NULL REFERENCES identity.users (id) ON DELETE CASCADE,
    role text NOT NULL CHECK (role IN ('user', 'trader', 'instructor', 'support', 'auditor', 'admin',
                                       'seller', 'buyer', 'agent', 'nbfc')),
    granted_at timestamptz NOT NULL DEFAULT now(),
    granted_by uuid,
    PRIMARY KEY (user_id, role)
);

CREATE TABLE identity.preferences (
    user_id uuid PRIMARY KEY REFERENCES identity.users (id) ON DELETE CASCADE,
    data jsonb NOT NULL DEFAULT '{}'::jsonb,
    updated_at timestamptz NOT NULL DEFAULT now()
);

-- KYC: the document number is stored only encrypted (AES-256-GCM) plus its last 4
-- characters for the masked form shown in responses.
CREATE TABLE identity.kyc_submissions (
    id uuid PRIMARY KEY,
    user_id uuid NOT NULL REFERENCES identity.users (id) ON DELETE CASCADE,
    document_type text NOT NULL,
    document_number_enc bytea NOT NULL,
    document_number_last4 text NOT NULL,
    address jsonb NOT NULL,
    date_of_birth date NOT NULL,
    status text NOT NULL CHECK (status IN ('pending', 'approved', 'rejected')),
    reason text,
    submitted_at timestamptz NOT NULL DEFAULT now(),
    decided_at timestamptz,
    decided_by uuid
);
CREATE INDEX kyc_submissions_user ON identity.kyc_submissions (user_id, submitted_at DESC);

-- One row per login (a refresh-token family); access tokens carry its id as `sid`.
CREATE TABLE identity.sessions (
    id uuid PRIMARY KEY,
    user_id uuid NOT NULL REFERENCES identity.users (id) ON DELETE CASCADE,
    created_at timestamptz NOT NULL DEFAULT now(),
    last_used_at timestamptz NOT NULL DEFAULT now(),
    expires_at timestamptz NOT NULL,
    revoked_at timestamptz,
    revoked_reason text,
    user_agent text,
    ip text
);
CREATE INDEX sessions_user ON identity.sessions (user_id, created_at DESC, id DESC);

-- Every refresh token ever issued, by SHA-256 of the token: a token seen again after it
-- was used is a reuse, and revokes its whole session family.
CREATE TABLE identity.refresh_tokens (
    token_hash bytea PRIMARY KEY,
    session_id uuid NOT NULL REFERENCES identity.sessions (id) ON DELETE CASCADE,
    issued_at timestamptz NOT NULL DEFAULT now(),
    expires_at timestamptz NOT NULL,
    used_at timestamptz
);
CREATE INDEX refresh_tokens_session ON identity.refresh_tokens (session_id);

-- Service-to-service API keys: only the SHA-256 of the secret part is kept.
CREATE TABLE identity.api_keys (
    id uuid PRIMARY KEY,
    prefix text NOT NULL UNIQUE,
    secret_hash bytea NOT NULL,
    name text NOT NULL,
    scopes text[] NOT NULL,
    created_by uuid NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    revoked_at timestamptz,
    last_used_at timestamptz
);
CREATE INDEX api_keys_created ON identity.api_keys (created_at DESC, id DESC);

-- Transactional outbox for identity.events: written in the same transaction as the change
-- it describes, so no committed change is lost between PostgreSQL and Kafka.
CREATE TABLE identity.outbox (
    seq bigserial PRIMARY KEY,
    event_id uuid NOT NULL UNIQUE,
    type text NOT NULL,
    key text NOT NULL,
    payload jsonb NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    published_at timestamptz
);
CREATE INDEX outbox_unpublished ON identity.outbox (seq) WHERE published_at IS NULL;
