import type { Session } from '@shopify/shopify-api';
import type { SessionStorage } from '@shopify/shopify-app-session-storage';

/** Where the broker listens: one of these, else `$TOKENWAL_BROKER_ADDRESS`. */
export interface BrokerClientOptions {
  /** The broker's Unix socket path. */
  socketPath?: string;
  /** `http://127.0.0.1:PORT` (loopback only). */
  url?: string;
  /** The CLI's `--listen` syntax: `unix:/path` or `tcp:127.0.0.1:PORT`. */
  address?: string;
  /** Bearer token; default `$TOKENWAL_BROKER_TOKEN`. */
  token?: string;
  /** Deadline of one call in ms (default 15000). */
  timeoutMs?: number;
  /** Connection pool size (default 64). */
  maxSockets?: number;
}

/** A fresh access token; `util.inspect` and `JSON.stringify` show it redacted. */
export declare class BrokerToken {
  readonly shop: string;
  readonly accessToken: string;
  readonly expiresAt: Date;
  readonly expiresIn: number;
  readonly scope: string | null;
}

export interface GrantInput {
  accessToken: string;
  refreshToken: string;
  expiresAt?: Date;
  expiresIn?: number;
  refreshTokenExpiresAt?: Date;
  refreshTokenExpiresIn?: number;
  scope?: string | null;
}

export interface GrantNeedingReauth {
  shop: string;
  state: string;
  reason: string;
  since: string;
  reauth_url: string | null;
}

export declare class BrokerClient {
  constructor(options?: BrokerClientOptions);
  getToken(shop: string): Promise<BrokerToken>;
  reportUnauthorized(shop: string, accessToken: string): Promise<BrokerToken>;
  installGrant(shop: string, grant: GrantInput): Promise<{ installed: true }>;
  tokenExchange(shop: string, sessionToken: string): Promise<BrokerToken>;
  uninstall(shop: string, triggeredAt?: Date): Promise<{ uninstalled: boolean }>;
  grants(state?: string): Promise<GrantNeedingReauth[]>;
  healthz(): Promise<{ status: 'alive' }>;
  readyz(): Promise<{ ready: true }>;
  close(): void;
}

export interface TokenwalSessionStorageOptions {
  /** A broker client; else one is made from `brokerOptions` or the environment. */
  broker?: BrokerClient;
  brokerOptions?: BrokerClientOptions;
  /** Storage for online sessions and every id that is not `offline_{shop}`. */
  inner?: SessionStorage;
}

/** Offline sessions in tokenwal; everything else in `inner`. */
export declare class TokenwalSessionStorage implements SessionStorage {
  constructor(options?: TokenwalSessionStorageOptions);
  readonly broker: BrokerClient;
  storeSession(session: Session): Promise<boolean>;
  loadSession(id: string): Promise<Session | undefined>;
  deleteSession(id: string): Promise<boolean>;
  deleteSessions(ids: string[]): Promise<boolean>;
  findSessionsByShop(shop: string): Promise<Session[]>;
}

export interface TokenwalErrorOptions {
  code?: string;
  status?: number;
  shop?: string;
}

export declare class TokenwalError extends Error {
  /** The broker's error code (`not_installed`, …) or a local one (`connection`, `timeout`, `bad_answer`). */
  readonly code: string | undefined;
  /** The HTTP status of the broker's answer, if any. */
  readonly brokerStatus: number | undefined;
  readonly shop: string | undefined;
}
export declare class NotInstalledError extends TokenwalError {}
export declare class NeedsReauthError extends TokenwalError {
  readonly state: string | null;
  readonly reason: string | null;
  readonly since: Date | null;
  readonly reauthUrl: string | null;
}
export declare class UnavailableError extends TokenwalError {
  readonly reason: 'recovering' | 'store_poisoned' | 'store_unavailable' | 'app_credentials_rejected' | 'upstream' | string | null;
  /** Seconds to wait before trying again. */
  readonly retryAfter: number | null;
  /** 503, for web frameworks that answer with an error's `status`. */
  readonly status: 503;
}
export declare class OlderPairError extends TokenwalError {}
export declare class BrokerAuthError extends TokenwalError {}
export declare class BadRequestError extends TokenwalError {}
export declare class BrokerConnectionError extends TokenwalError {
  readonly status: 503;
}

export declare const ENV_TOKEN: 'TOKENWAL_BROKER_TOKEN';
export declare const ENV_ADDRESS: 'TOKENWAL_BROKER_ADDRESS';
