-- A small film rental schema for the demo recipe.
CREATE TABLE language (
    language_id serial PRIMARY KEY,
    name text NOT NULL UNIQUE
);

CREATE TABLE film (
    film_id serial PRIMARY KEY,
    title text NOT NULL,
    release_year int NOT NULL CHECK (release_year BETWEEN 1888 AND 2100),
    language_id int NOT NULL REFERENCES language,
    rental_rate numeric(4, 2) NOT NULL DEFAULT 4.99,
    length_minutes int
);

CREATE TABLE rental (
    rental_id bigserial PRIMARY KEY,
    film_id int NOT NULL REFERENCES film,
    rented_at timestamptz NOT NULL DEFAULT now(),
    returned_at timestamptz
);
