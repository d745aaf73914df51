from scifm.train.entry import hydra_train

if __name__ == "__main__":
    hydra_train()
