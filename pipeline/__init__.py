"""Parts the stages share: sources, VAE loading, stores, statistics, configs, the ReVQ model."""
