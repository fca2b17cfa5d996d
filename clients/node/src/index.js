'use strict';

const { BrokerClient, BrokerToken, ENV_TOKEN, ENV_ADDRESS } = require('./client');
const { TokenwalSessionStorage } = require('./storage');
const errors = require('./errors');

module.exports = {
  TokenwalSessionStorage,
  BrokerClient,
  BrokerToken,
  ENV_TOKEN,
  ENV_ADDRESS,
  TokenwalError: errors.TokenwalError,
  NotInstalledError: errors.NotInstalledError,
  NeedsReauthError: errors.NeedsReauthError,
  UnavailableError: errors.UnavailableError,
  OlderPairError: errors.OlderPairError,
  BrokerAuthError: errors.BrokerAuthError,
  BadRequestError: errors.BadRequestError,
  BrokerConnectionError: errors.BrokerConnectionError,
};
